"""`fedge-hub foundation train` on a user folder writes a complete, loadable bundle with its manifest."""

import json
from pathlib import Path

import numpy as np
import pytest

from edge.encoder import OnnxEncoder
from hub import datasets
from hub.cli import main as hub_main
from hub.foundation.bundle import load, sha256_file

pytestmark = pytest.mark.slow


def test_train_from_a_folder_writes_a_bundle(tmp_path: Path) -> None:
    data = datasets.load("digits")
    datasets.write_folder(tmp_path / "data", data, np.arange(300))
    out = tmp_path / "bundle"
    argv = ["foundation", "train", "--dataset", str(tmp_path / "data"), "--out", str(out)]
    assert hub_main([*argv, "--diffusion-steps", "20", "--simclr-steps", "20"]) == 0

    manifest = json.loads((out / "manifest.json").read_text())
    # How it was made: dataset, split, public-index hash, command, steps, wall time, quality.
    assert manifest["dataset"]["n_public"] == 120
    assert len(manifest["dataset"]["public_indices_sha256"]) == 64
    assert manifest["command"].startswith("fedge-hub foundation train")
    assert manifest["training"]["diffusion_steps"] == 20
    assert manifest["training"]["total_wall_s"] > 0
    assert set(manifest["quality"]["per_class"]) == {str(i) for i in range(10)}
    for name, digest in manifest["files"].items():
        assert sha256_file(out / name) == digest
    # Both sides can load it: the edge its ONNX encoder, the hub its generator.
    assert OnnxEncoder(out / "encoder.onnx").encode(data.images[:4]).shape == (4, 32)
    assert load(out).encoder_id == manifest["encoder_id"]
