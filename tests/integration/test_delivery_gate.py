"""The delivery gate through the services: a model at chance is not served as an improvement, and the operator is told.

Three sites whose labels carry no information (each image's label drawn at random): whatever the hub trains from
their uploads, no head can beat chance on their held-out samples. The sites evaluate every head, the gate refuses
the model (`at_chance`), the sites keep serving nothing, and the hub's status, log, ledger and metrics say why.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from contract import signing
from contract.payloads import HubStatus, SiteStatus
from contract.topics import Topics
from hub import datasets
from hub.service import HubService
from hub.unlearning import audit
from runtime.mqtt import BrokerSettings
from tests.integration.helpers import Watcher, start_edge, stop_edges, wait_for

pytestmark = pytest.mark.slow
TOPICS = Topics()
SITES = ("line-a", "line-b", "line-c")


def write_random_labels(root: Path, data: datasets.Dataset, indices: np.ndarray, seed: int) -> None:
    """`<root>/<good|defect>/<id>.png`: digits images under a label drawn at random, so labels mean nothing."""
    rng = np.random.default_rng(seed)
    for i in indices:
        label = ("good", "defect")[int(rng.integers(2))]
        (root / label).mkdir(parents=True, exist_ok=True)
        Image.fromarray((data.images[i, 0] * 255).round().astype(np.uint8), mode="L").save(root / label / f"{i}.png")


def test_a_model_at_chance_is_not_served_and_the_operator_is_told(
    hub_factory: Callable[..., HubService], mosquitto: BrokerSettings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A 0.2 margin over chance (0.5) keeps the test far from the noise of ~100 pooled held-out samples.
    hub = hub_factory(delivery={"chance_margin": 0.2, "wait_s": 300})
    watcher = Watcher(mosquitto, [TOPICS.hub_status, TOPICS.all_sites("status")])
    data = datasets.load("digits")
    procs = {}
    caplog.set_level(logging.WARNING, logger="fedge.hub")
    try:
        for n, s in enumerate(SITES):
            write_random_labels(tmp_path / s / "data", data, np.arange(n * 160, (n + 1) * 160), seed=n)
            procs[s] = start_edge(s, tmp_path / s / "data", tmp_path / s / "state", mosquitto.port,
                                  tmp_path / f"{s}.log", prefer_cuda="false")  # fmt: skip

        def decided() -> bool:
            latest = hub.registry.latest()
            return latest is not None and hub.ledger.gate_decision(latest.version) is not None

        wait_for(decided, 600, "the delivery gate to decide on the first model")

        def told() -> bool:
            statuses = [HubStatus.model_validate_json(p) for p in watcher.on(TOPICS.hub_status) if p]
            return bool(statuses) and statuses[-1].delivery is not None and statuses[-1].delivery.state == "at_chance"

        wait_for(told, 60, "the hub status to carry the gate's decision")
    finally:
        stop_edges(procs)
        watcher.stop()
    version = hub.registry.latest().version
    decision = hub.ledger.gate_decision(version)
    assert decision["state"] == "at_chance" and decision["serve"] is None, decision
    assert "not served as an improvement" in decision["reason"]
    assert decision["samples"] >= 60  # every site's held-out samples are in it
    assert any("delivery gate at_chance" in r.getMessage() for r in caplog.records)
    assert hub.metrics.registry.get_sample_value("fedge_hub_delivery_gate_total", {"state": "at_chance"}) == 1
    for s in SITES:
        last = [SiteStatus.model_validate_json(b) for b in watcher.on(TOPICS.site(s, "status")) if b][-1]
        assert last.model_version == version and last.serving_version is None  # installed, evaluated, not served
        assert "Traceback" not in (tmp_path / f"{s}.log").read_text()
    # The signed manifest the sites received says the same, and the audit trail keeps it, verifiably.
    assert '"state":"at_chance"' in decision["signed_manifest"]
    pem = signing.public_pem(hub.signing_key.public_key())
    audit.export(hub.ledger, pem, tmp_path / "audit")
    report = audit.verify(tmp_path / "audit", pem)
    assert report["ok"] and report["checked"]["gate_decisions"] == 1, report
    trail = tmp_path / "audit" / "audit.jsonl"
    trail.write_text(trail.read_text().replace('\\"serve\\": null', '\\"serve\\": \\"logits\\"'))
    assert not audit.verify(tmp_path / "audit", pem)["ok"]  # a record that no longer says what was signed
