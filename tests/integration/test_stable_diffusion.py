"""Stable Diffusion backend, offline: tiny random components from configs, encoders exported to ONNX, the whole path."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edge.clip import OnnxClipImageEncoder, OnnxTextEncoder
from edge.config import EdgeSettings
from edge.models import ModelStore
from edge.service import EdgeService
from hub.config import HubSettings
from hub.service import HubService
from runtime.mqtt import BrokerSettings
from tests.fixtures import tiny_sd
from tests.unit.test_edge_no_torch import run_probe

pytestmark = pytest.mark.slow


def exported(model: Path) -> tuple[Path, Path]:
    """`fedge-hub export-encoders` on `model`, as a user runs it."""
    root = model.parent
    out = subprocess.run(
        [sys.executable, "-m", "hub.cli", "export-encoders", "--model", str(model), "--out", str(root / "encoders")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return model, root / "encoders"


@pytest.fixture(scope="module")
def sd_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny random checkpoint, and its encoders exported by the real command."""
    return exported(tiny_sd.build(tmp_path_factory.mktemp("sd") / "model"))


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
        "from edge.clip import OnnxTextEncoder\n"
        f"e = OnnxTextEncoder({str(encoders)!r}).encode(['a photo of the digit one'])\n"
        "assert e.shape == (1, 512)"
    )
    assert run_probe(code) == []


@pytest.fixture(scope="module")
def unclip_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny random unCLIP checkpoint (image-embedding conditioned) and its exported encoders."""
    return exported(tiny_sd.build_unclip(tmp_path_factory.mktemp("unclip") / "model"))


def test_exported_image_encoder_and_edge_preprocessing_match_torch(unclip_dirs: tuple[Path, Path]) -> None:
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    model, encoders = unclip_dirs
    images = [np.random.default_rng(i).random((8 + 2 * i, 8 + 2 * i), dtype=np.float32) for i in range(3)]
    edge = OnnxClipImageEncoder(encoders)
    proc = CLIPImageProcessor.from_pretrained(str(model / "feature_extractor"))
    pil = [Image.fromarray((im * 255).round().astype(np.uint8), "L").convert("RGB") for im in images]
    pixels = proc(images=pil, return_tensors="pt").pixel_values
    assert np.abs(np.stack([edge.preprocess(im) for im in images]) - pixels.numpy()).max() < 1e-2
    with torch.no_grad():
        ref = (
            CLIPVisionModelWithProjection.from_pretrained(str(model / "image_encoder"))
            .eval()(pixels)
            .image_embeds.numpy()
        )
    assert np.abs(edge.encode(images) - ref).max() < 1e-3


def site_folder(root: Path) -> Path:
    """8x8 images of two labels; half the "bad" parts have captions in metadata.csv."""
    data = root / "data"
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
    return data


def start_hub(
    mosquitto: BrokerSettings, model: Path, encoders: Path, state: Path
) -> tuple[HubService, threading.Thread]:
    settings = HubSettings(
        state_dir=state, broker=mosquitto, metrics_port=None, backend="stable-diffusion",
        stable_diffusion={"model_dir": model, "encoders_dir": encoders, "image_size": 8},
        rounds={"min_sites": 1, "poll_s": 0.2},
        synthesis={"samples_per_count": 1.0, "steps": 3, "guidance": 2.0, "epochs": 3},
    )  # fmt: skip
    hub = HubService(settings)
    thread = threading.Thread(target=hub.run)
    thread.start()
    return hub, thread


def one_round(mosquitto: BrokerSettings, model: Path, encoders: Path, tmp_path: Path, **edge_settings):
    """Hub (Stable Diffusion backend) and one edge on the real broker until the edge has evaluated model v1."""
    hub, hub_thread = start_hub(mosquitto, model, encoders, tmp_path / "hub")
    edge = EdgeService(EdgeSettings(
        site_id="plant-a", data_dir=site_folder(tmp_path / "site"), state_dir=tmp_path / "site" / "state",
        broker=mosquitto, metrics_port=None, sd_encoders_dir=encoders, k=2, settle_s=0, scan_interval_s=0.5,
        **edge_settings,
    ))  # fmt: skip
    thread = threading.Thread(target=edge.run)
    thread.start()
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not hub.ledger.evaluations(1):
            time.sleep(0.2)
        edge.stop_event.set()
        thread.join(30)
        (contribution,) = hub.ledger.active()
        version = hub.registry.latest()
        assert version is not None and version.manifest["contributions"] == [contribution.contribution_id]
        assert version.manifest["synthetic_samples"] > 0 and version.manifest["labels"] == ["bad", "good"]
        path, manifest = ModelStore(tmp_path / "site" / "state" / "models").current()
        assert manifest.sha256 == version.sha256
        (evaluation,) = hub.ledger.evaluations(1)
        assert evaluation["site_id"] == "plant-a" and evaluation["samples"] > 0
        return contribution
    finally:
        edge.stop_event.set()
        thread.join(30)
        hub.stop_event.set()
        hub_thread.join(60)


def test_edge_prompts_over_mqtt_to_the_pipeline_and_back_as_a_model(
    sd_dirs: tuple[Path, Path], mosquitto: BrokerSettings, tmp_path: Path
) -> None:
    model, encoders = sd_dirs
    contribution = one_round(mosquitto, model, encoders, tmp_path, prompt_template="a photo of the {label} part")
    # Prompt embeddings of the exported encoder's shape went up, never the prompt text.
    assert contribution.encoder_id == OnnxTextEncoder(encoders).encoder_id
    assert contribution.dim == 16 * 32
    assert "scratched" not in contribution.to_json_bytes().decode()


def test_unclip_image_embeddings_over_mqtt_to_the_pipeline_and_back(
    unclip_dirs: tuple[Path, Path], mosquitto: BrokerSettings, tmp_path: Path
) -> None:
    model, encoders = unclip_dirs
    contribution = one_round(mosquitto, model, encoders, tmp_path, sd_conditioning="image")
    assert contribution.encoder_id == OnnxClipImageEncoder(encoders).encoder_id
    assert contribution.dim == 32
