"""A factory's own images through the services: 300x300 grayscale PNGs at three sites, no public data at the hub.

The hub synthesizes in the encoder's feature space (closed_form.synthesis: features, Gaussian sampling around the
prototypes: the behaviour without public data), the edges resize to the encoder's input, send refinement statistics
of the delivered model's features, and every site serves the refined model's head the delivery gate chose, without
an error report or a traceback in any log. CI has no general bundle (it is built
from a package's weights by `make general`), so the digits bundle stands in for it: the path is the same.
FEDGE_TEST_BUNDLE=<bundle dir> runs the same test on another bundle (for example the general one).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from contract.payloads import SiteStatus
from contract.topics import Topics
from hub import datasets
from hub.learning.feature_synthesis import FeatureSynthesizer
from hub.service import HubService
from runtime.mqtt import BrokerSettings
from tests.integration.helpers import Watcher, start_edge, stop_edges, wait_for

pytestmark = pytest.mark.slow
TOPICS = Topics()
SITES = ("line-a", "line-b", "line-c")
SIDE = 300
BUNDLE = os.environ.get("FEDGE_TEST_BUNDLE", "digits")


def write_pngs(root: Path, data: datasets.Dataset, indices: np.ndarray) -> None:
    """`<root>/<label>/<id>.png`, each image enlarged to SIDE x SIDE 8-bit grayscale (as a camera would give)."""
    for i in indices:
        label = data.label_names[data.labels[i]]
        (root / label).mkdir(parents=True, exist_ok=True)
        img = Image.fromarray((data.images[i, 0] * 255).round().astype(np.uint8), mode="L")
        img.resize((SIDE, SIDE), Image.Resampling.BILINEAR).save(root / label / f"img-{int(i)}.png")


def test_sites_with_300px_grayscale_images_and_no_public_data_get_a_delivered_model(
    hub_factory: Callable[..., HubService], mosquitto: BrokerSettings, tmp_path: Path
) -> None:
    # With the refinement round: the sites' statistics of the delivered model's features make a second, refined
    # model (over the random features of the 32-d digits encoder; over the embedding of the general one).
    hub = hub_factory(rounds={"min_sites": 3, "poll_s": 0.2, "refine": True}, closed_form={"synthesis": "features"},
                      foundation=BUNDLE)  # fmt: skip
    assert isinstance(hub.synthesizer, FeatureSynthesizer)  # no image generator is used
    watcher = Watcher(mosquitto, [TOPICS.all_sites("status"), TOPICS.all_sites("errors")])
    data = datasets.load("digits")
    procs = {}
    try:
        for i, s in enumerate(SITES):
            write_pngs(tmp_path / s / "data", data, np.arange(i * 60, (i + 1) * 60))
            procs[s] = start_edge(s, tmp_path / s / "data", tmp_path / s / "state", mosquitto.port,
                                  tmp_path / f"{s}.log", prefer_cuda="false", bundle=BUNDLE)  # fmt: skip

        def installed() -> bool:
            for s in SITES:
                statuses = [SiteStatus.model_validate_json(b) for b in watcher.on(TOPICS.site(s, "status")) if b]
                if not statuses or statuses[-1].model_version is None:
                    return False
            return True

        wait_for(installed, 600, "every site to install the delivered model")

        def refined() -> bool:
            latest = hub.registry.latest()
            return latest.manifest.get("refinement", {}).get("sites") == list(SITES)

        wait_for(refined, 300, "a model refined from the three sites' statistics")

        def served() -> bool:  # the delivery gate decided on the sites' held-out evaluations of every head
            v = hub.registry.latest().version
            decision = hub.ledger.gate_decision(v)
            if decision is None:
                return False
            for s in SITES:
                last = [SiteStatus.model_validate_json(b) for b in watcher.on(TOPICS.site(s, "status")) if b][-1]
                if (last.serving_version, last.serving_head) != (v, decision["serve"]):
                    return False
            return True

        wait_for(served, 300, "the delivery gate to decide and every site to serve its choice")
    finally:
        stop_edges(procs)
        watcher.stop()
    latest = hub.registry.latest()
    assert latest is not None and latest.version >= 1
    for s in SITES:
        assert watcher.on(TOPICS.site(s, "errors")) == []  # nothing the hub rejected
        log_text = (tmp_path / f"{s}.log").read_text()
        assert "Traceback" not in log_text, log_text[-2000:]
        last = [SiteStatus.model_validate_json(b) for b in watcher.on(TOPICS.site(s, "status")) if b][-1]
        assert last.model_version == latest.version
    decision = hub.ledger.gate_decision(latest.version)
    assert decision["state"] == "served", decision
    assert set(decision["balanced_accuracy"]) == set(latest.manifest["heads"])
    assert {"logits", "head_refined_0", "head_nearest_prototype"} <= set(latest.manifest["heads"])
    best = max(v for v in decision["balanced_accuracy"].values() if v is not None)
    assert decision["balanced_accuracy"][decision["serve"]] == best > 0.5
    assert decision["samples"] == sum(r["samples"] for r in hub.ledger.evaluations(latest.version))
