"""Stable Diffusion backend, offline: tiny random components from configs, encoders exported to ONNX, the whole path."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from edge.config import EdgeSettings
from edge.models import ModelStore
from edge.service import EdgeService
from edge.text_encoder import OnnxTextEncoder
from hub.config import HubSettings
from hub.service import HubService
from runtime.mqtt import BrokerSettings
from tests.fixtures import tiny_sd
from tests.unit.test_edge_no_torch import run_probe

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sd_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny random checkpoint, and its encoders exported by the real command."""
    root = tmp_path_factory.mktemp("sd")
    model = tiny_sd.build(root / "model")
    out = subprocess.run(
        [sys.executable, "-m", "hub.cli", "export-encoders", "--model", str(model), "--out", str(root / "encoders")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return model, root / "encoders"


def test_exported_text_encoder_matches_torch(sd_dirs: tuple[Path, Path]) -> None:
    import torch
    from transformers import AutoTokenizer, CLIPTextModel

    model, encoders = sd_dirs
    manifest = json.loads((encoders / "manifest.json").read_text())
    assert manifest["text"]["max_length"] == 16 and manifest["text"]["dim"] == 32
    prompts = ["a photo of the digit three", "scratched part with dent", "an unknown word zebra", ""]
    edge = OnnxTextEncoder(encoders)
    tok = AutoTokenizer.from_pretrained(str(model / "tokenizer"))
    ids = tok(prompts, padding="max_length", max_length=16, truncation=True, return_tensors="pt").input_ids
    assert np.array_equal(edge.token_ids(prompts), ids.numpy())  # the edge tokenizes as the pipeline does
    with torch.no_grad():
        ref = CLIPTextModel.from_pretrained(str(model / "text_encoder")).eval()(ids)[0].numpy()
    got = edge.encode(prompts).reshape(ref.shape)
    assert np.abs(got - ref).max() < 1e-3


def test_edge_text_path_loads_no_torch(sd_dirs: tuple[Path, Path]) -> None:
    _, encoders = sd_dirs
    code = (
        "from edge.text_encoder import OnnxTextEncoder\n"
        f"e = OnnxTextEncoder({str(encoders)!r}).encode(['a photo of the digit one'])\n"
        "assert e.shape == (1, 512)"
    )
    assert run_probe(code) == []


@pytest.fixture
def sd_hub(mosquitto: BrokerSettings, sd_dirs: tuple[Path, Path], tmp_path: Path) -> Iterator[HubService]:
    model, encoders = sd_dirs
    settings = HubSettings(
        state_dir=tmp_path / "hub", broker=mosquitto, metrics_port=None, backend="stable-diffusion",
        stable_diffusion={"model_dir": model, "encoders_dir": encoders, "image_size": 8},
        rounds={"min_sites": 1, "poll_s": 0.2},
        synthesis={"samples_per_count": 1.0, "steps": 3, "guidance": 2.0, "epochs": 3},
    )  # fmt: skip
    hub = HubService(settings)
    thread = threading.Thread(target=hub.run)
    thread.start()
    try:
        yield hub
    finally:
        hub.stop_event.set()
        thread.join(60)


def test_edge_prompts_over_mqtt_to_the_pipeline_and_back_as_a_model(
    sd_hub: HubService, sd_dirs: tuple[Path, Path], mosquitto: BrokerSettings, tmp_path: Path
) -> None:
    _, encoders = sd_dirs
    # A site folder: 8x8 images of two labels; half the "bad" parts have captions in metadata.csv.
    data = tmp_path / "site" / "data"
    rng = np.random.default_rng(0)
    rows = []
    for label in ("good", "bad"):
        (data / label).mkdir(parents=True)
        for i in range(15):
            sid = f"{label}{i:02d}"
            np.save(data / label / f"{sid}.npy", rng.random((8, 8), dtype=np.float32))
            caption = "scratched part with dent" if label == "bad" and i % 2 else ""
            rows.append({"sample_id": sid, "label": label, "timestamp": "", "caption": caption})
    with open(data / "metadata.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["sample_id", "label", "timestamp", "caption"])
        w.writeheader()
        w.writerows(rows)
    edge = EdgeService(EdgeSettings(
        site_id="plant-a", data_dir=data, state_dir=tmp_path / "site" / "state", broker=mosquitto, metrics_port=None,
        text_encoder_dir=encoders, prompt_template="a photo of the {label} part", k=2, settle_s=0, scan_interval_s=0.5,
    ))  # fmt: skip
    thread = threading.Thread(target=edge.run)
    thread.start()
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not sd_hub.ledger.evaluations(1):
            time.sleep(0.2)
    finally:
        edge.stop_event.set()
        thread.join(30)
    # The contribution carried prompt embeddings of the exported encoder's shape, never text.
    (contribution,) = sd_hub.ledger.active()
    assert contribution.encoder_id == OnnxTextEncoder(encoders).encoder_id
    assert contribution.dim == 16 * 32
    assert "scratched" not in contribution.to_json_bytes().decode()
    # The hub synthesized with the pipeline, trained and delivered; the site verified and evaluated it.
    version = sd_hub.registry.latest()
    assert version is not None and version.manifest["contributions"] == [contribution.contribution_id]
    assert version.manifest["synthetic_samples"] > 0 and version.manifest["labels"] == ["bad", "good"]
    path, manifest = ModelStore(tmp_path / "site" / "state" / "models").current()
    assert manifest.sha256 == version.sha256
    (evaluation,) = sd_hub.ledger.evaluations(1)
    assert evaluation["site_id"] == "plant-a" and evaluation["samples"] > 0
