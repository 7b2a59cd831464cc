"""The message path holds against any payload: poison messages, id-less uploads, bad models, SIGTERM mid-round."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from bench.fuzz import NASTY_VALUES
from contract import signing
from contract.payloads import ChunkRef, ErrorReport, ModelChunk, SiteStatus
from contract.topics import Topics
from edge.models import ModelStore
from hub import datasets
from hub.ledger import Ledger
from hub.service import HubService
from runtime.mqtt import BrokerSettings
from tests.fixtures.onnx_models import tiny_classifier
from tests.integration.helpers import Watcher, good_contribution, start_edge, wait_for

pytestmark = pytest.mark.slow
TOPICS = Topics()


def poison_payloads(hub: HubService, n: int) -> list[bytes]:
    """`n` payloads that each once crashed or stalled a handler somewhere: deep nesting, huge numbers, bad bytes."""
    good = json.loads(good_contribution(hub, "site-a").to_json_bytes())
    eval_body = {"schema_version": 1, "eval_id": "ab" * 16, "site_id": "site-a", "model_version": 1,
                 "at": "2026-11-22T03:11:08Z", "samples": 10, "accuracy": 0.5}  # fmt: skip
    made = [
        b"[" * 100_000 + b"]" * 100_000,  # RecursionError in the JSON decoder
        json.dumps({**good, "k": 10**30}).encode(),  # too large for SQLite
        json.dumps({**eval_body, "samples": 2**70}).encode(),
        json.dumps({**eval_body, "samples": "@"}).encode().replace(b'"@"', b"9" * 5000),  # 5,000 digits
        json.dumps({**good, "schema_version": True}).encode(),
        json.dumps({**good, "created_at": "2026-11-22T03:21:54"}).encode(),  # no zone
        json.dumps({k: v for k, v in good.items() if k != "contribution_id"}).encode(),  # no id
        json.dumps(good).encode()[:-1] + b',"k":2}',  # duplicate key
        bytes(range(256)),
    ]  # fmt: skip
    made += list(NASTY_VALUES)
    return [made[i % len(made)] for i in range(n)]


def rejected(hub: HubService) -> float:
    reg = hub.metrics.registry
    return sum(reg.get_sample_value("fedge_hub_messages_total", {"kind": k, "result": "rejected"}) for k in ("embeddings", "eval"))  # fmt: skip


def test_poison_messages_cannot_stall_the_hub_even_across_a_restart(
    hub_factory: Callable[..., HubService], mosquitto: BrokerSettings
) -> None:
    hub = hub_factory(rounds={"min_sites": 1, "poll_s": 0.2})
    watcher = Watcher(mosquitto, [TOPICS.all_sites("errors"), TOPICS.hub_model])
    poison = poison_payloads(hub, 100)
    for i, p in enumerate(poison):
        watcher.publish(TOPICS.site("site-a", "embeddings" if i % 2 else "eval"), p)
    wait_for(lambda: rejected(hub) == 100, 60, "100 poison payloads to be rejected")
    wait_for(lambda: len(watcher.on(TOPICS.site("site-a", "errors"))) == 100, 30, "100 error reports")
    codes = {ErrorReport.model_validate_json(p).code for p in watcher.on(TOPICS.site("site-a", "errors"))}
    assert "internal" not in codes and {"invalid", "not_json", "non_finite", "schema_version"} <= codes
    assert len(hub.ledger.rejections()) == 100
    # The id-less upload was refused, so it cannot start any round.
    assert hub.ledger.rounds() == [] and hub.ledger.contribution_ids() == []

    c = good_contribution(hub, "site-a")
    watcher.publish(TOPICS.site("site-a", "embeddings"), c.to_json_bytes())
    wait_for(lambda: c.contribution_id in hub.ledger.contribution_ids(), 30, "the valid contribution after the poison")
    wait_for(lambda: [r.state for r in hub.ledger.rounds()] == ["done"], 120, "a round on it")
    # The ledger, the round and the signed manifest name the same ids.
    wait_for(lambda: bool(watcher.on(TOPICS.hub_model)), 60, "the model manifest")  # delivered after the ledger
    manifest = json.loads(watcher.on(TOPICS.hub_model)[-1])
    assert hub.ledger.rounds()[0].contributions == [c.contribution_id] == manifest["contributions"]
    assert [x.contribution_id for x in hub.ledger.active()] == [c.contribution_id]
    time.sleep(2 * hub.settings.rounds.poll_s + 1)
    assert len(hub.ledger.rounds()) == 1  # nothing new came in: no second round

    # Poison queued for the hub while it is away is delivered first after a restart; it must not stall it.
    hub.stop_event.set()
    wait_for(lambda: not hub.bus.connected, 30, "the hub to stop")
    time.sleep(0.5)
    for p in poison[:40]:
        watcher.publish(TOPICS.site("site-b", "embeddings"), p)
    hub2 = hub_factory(rounds={"min_sites": 1, "poll_s": 0.2})
    c2 = good_contribution(hub2, "site-b", seed=3)
    watcher.publish(TOPICS.site("site-b", "embeddings"), c2.to_json_bytes())
    wait_for(lambda: c2.contribution_id in hub2.ledger.contribution_ids(), 60, "a contribution after queued poison")
    assert rejected(hub2) == 40
    watcher.stop()


def signed_manifest(key, version: int, data: bytes, labels: list[str]) -> tuple[bytes, list[tuple[str, bytes]]]:
    """A hub's messages for `data` as model `version`, signed with `key` (the way hub/delivery.py does it)."""
    import base64

    body = {
        "schema_version": 1, "message_id": f"{version:032x}", "version": version, "created_at": "2026-11-22T03:11:08Z",
        "format": "onnx", "sha256": hashlib.sha256(data).hexdigest(), "size_bytes": len(data),
        "chunks": [ChunkRef(index=0, size_bytes=len(data), sha256=hashlib.sha256(data).hexdigest()).model_dump()],
        "labels": labels, "input_name": "image", "input_shape": [-1, 1, 8, 8], "encoder_id": "digits-2d0522e10c62",
        "contributions": [], "fedavg_round_bytes": 1000,
    }  # fmt: skip
    chunk = ModelChunk(version=version, index=0, count=1, data=base64.b64encode(data).decode()).model_dump_json()
    return json.dumps(signing.sign(body, key)).encode(), [(TOPICS.model_chunk(version, 0), chunk.encode())]


def latest_status(watcher: Watcher, site: str) -> SiteStatus | None:
    msgs = [p for p in watcher.on(TOPICS.site(site, "status")) if p]
    return SiteStatus.model_validate_json(msgs[-1]) if msgs else None


def test_a_model_that_matches_its_hash_but_does_not_load_is_refused_and_the_site_restarts_cleanly(
    mosquitto: BrokerSettings, tmp_path: Path
) -> None:
    key = signing.write_keypair(tmp_path / "hub.pem")
    data = datasets.load("digits")
    datasets.write_folder(tmp_path / "data", data, np.arange(60))
    args = ("site-a", tmp_path / "data", tmp_path / "state", mosquitto.port, tmp_path / "edge.log")
    env = {"hub_public_key_file": str(tmp_path / "hub.pub.pem")}
    watcher = Watcher(mosquitto, [TOPICS.site("site-a", "status")])
    store = ModelStore(tmp_path / "state" / "models")
    edge = start_edge(*args, **env)
    try:
        good = tiny_classifier(n_classes=10)
        manifest, chunks = signed_manifest(key, 1, good, [str(i) for i in range(10)])
        for topic, payload in chunks:
            watcher.publish(topic, payload, retain=True)
        watcher.publish(TOPICS.hub_model, manifest, retain=True)
        wait_for(lambda: store.versions() == [1], 60, "model v1 installed")

        bad = b"\x08\x07" + os.urandom(2000)  # its sha256 is right; onnxruntime cannot load it
        manifest, chunks = signed_manifest(key, 2, bad, [str(i) for i in range(10)])
        for topic, payload in chunks:
            watcher.publish(topic, payload, retain=True)
        watcher.publish(TOPICS.hub_model, manifest, retain=True)

        def refused() -> bool:
            st = latest_status(watcher, "site-a")
            return st is not None and st.model_error is not None and "v2" in st.model_error

        wait_for(refused, 60, "the site to report model v2 refused")
        st = latest_status(watcher, "site-a")
        assert st.model_version == 1 and store.versions() == [1]
        assert "onnxruntime" in st.model_error

        # A manifest signed by another key is refused before any chunk is fetched.
        forged, _ = signed_manifest(signing.write_keypair(tmp_path / "evil.pem"), 3, good, ["0"])
        watcher.publish(TOPICS.hub_model, forged, retain=True)
        wait_for(lambda: "not trusted" in (latest_status(watcher, "site-a").model_error or ""), 60, "forgery refused")

        # Restart: the site comes back on v1 and does not fetch the refused models again.
        edge.send_signal(signal.SIGTERM)
        assert edge.wait(30) == 0
        watcher.messages.clear()
        edge = start_edge(*args, **env)
        wait_for(lambda: (s := latest_status(watcher, "site-a")) is not None and s.state == "online", 60, "restart")
        time.sleep(3)
        assert edge.poll() is None and store.versions() == [1]

        # A stored model that no longer loads (a disk fault) does not crash-loop the site either: it is set
        # aside, and the current model, still retained on the broker, is fetched and verified again.
        edge.send_signal(signal.SIGTERM)
        assert edge.wait(30) == 0
        (tmp_path / "state" / "models" / "v0001" / "model.onnx").write_bytes(b"bit rot")
        manifest, _ = signed_manifest(key, 1, good, [str(i) for i in range(10)])
        watcher.publish(TOPICS.hub_model, manifest, retain=True)
        watcher.messages.clear()
        edge = start_edge(*args, **env)

        def recovered() -> bool:
            st = latest_status(watcher, "site-a")
            return st is not None and st.state == "online" and st.model_version == 1 and st.model_error is None

        wait_for(recovered, 60, "the site to set its unloadable model aside and fetch v1 again")
        assert edge.poll() is None and store.versions() == [1]
        assert (tmp_path / "state" / "models" / "unloadable-v0001").is_dir()
        assert "stored model v1 does not load" in (tmp_path / "edge.log").read_text()
    finally:
        if edge.poll() is None:
            edge.send_signal(signal.SIGTERM)
            edge.wait(30)
        watcher.stop()
    assert edge.returncode == 0


def digits_encoder() -> SimpleNamespace:
    """What good_contribution needs of a hub, for the bundled digits encoder, without starting one."""
    import bundled

    m = bundled.manifest("digits")
    return SimpleNamespace(foundation=SimpleNamespace(dim=m["embedding_dim"], encoder_id=m["encoder_id"]))


def test_sigterm_mid_round_exits_within_10_s_and_the_round_is_redone(mosquitto: BrokerSettings, tmp_path: Path) -> None:
    contributions = [good_contribution(digits_encoder(), f"site-{i}", seed=i) for i in range(3)]
    state = tmp_path / "hub-proc"
    conf = tmp_path / "hub.yaml"
    conf.write_text(json.dumps({
        "state_dir": str(state), "broker": {"port": mosquitto.port}, "metrics_port": None, "hub_id": "proc",
        "rounds": {"min_sites": 3, "poll_s": 0.2}, "synthesis": {"samples_per_count": 6.0, "epochs": 20},
    }))  # fmt: skip
    log = open(tmp_path / "hub.log", "wb")  # noqa: SIM115 (closed below, after the process)

    def start() -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "hub.cli", "run", "--config", str(conf)],
                                stdout=log, stderr=subprocess.STDOUT)  # fmt: skip

    def rounds() -> list:
        if not (state / "ledger.sqlite").exists():
            return []
        ledger = Ledger(state / "ledger.sqlite")
        try:
            return ledger.rounds()
        finally:
            ledger.close()

    watcher = Watcher(mosquitto, [TOPICS.hub_model])
    proc = start()
    try:
        wait_for(lambda: (state / "ledger.sqlite").exists(), 60, "the hub process to open its ledger")
        time.sleep(2)
        for c in contributions:
            watcher.publish(TOPICS.site(c.site_id, "embeddings"), c.to_json_bytes())
        wait_for(lambda: any(r.state == "running" for r in rounds()), 120, "the round to start")
        time.sleep(1.0)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
        took = time.monotonic() - t0
        assert took < 10, f"SIGTERM took {took:.1f} s"
        assert code == 0
        first = rounds()
        assert first[0].state == "failed" and "stopped" in first[0].error
        assert first[-1].state == "requested" and first[-1].trigger == f"redo:{first[0].round_id}"
        assert not watcher.on(TOPICS.hub_model)  # nothing half-delivered

        proc = start()
        wait_for(lambda: any(r.state == "done" for r in rounds()), 300, "the round to be redone")
        done = [r for r in rounds() if r.state == "done"]
        assert len(done) == 1 and sorted(done[0].contributions) == sorted(c.contribution_id for c in contributions)
        wait_for(lambda: bool(watcher.on(TOPICS.hub_model)), 60, "the redone round's model")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
        log.close()
        watcher.stop()
