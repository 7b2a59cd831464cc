"""ONNX exports equal torch: the bundled encoder within 1e-4, the exported classifier too."""

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from edge.encoder import OnnxEncoder, choose_encoder
from hub import datasets
from hub.classifier import SmallCNN
from hub.export import export_classifier
from hub.foundation.bundle import load


def test_bundled_encoder_matches_torch(digits_bundle: Path) -> None:
    fm = load(digits_bundle)
    images = datasets.load("digits").images[:300]
    with torch.no_grad():
        ref = fm.load_torch_encoder()(torch.from_numpy(images)).numpy()
    got = OnnxEncoder(digits_bundle / "encoder.onnx").encode(images)
    assert np.abs(got - ref).max() < 1e-4


def test_batch_of_one_matches_torch(tiny_bundle: Path) -> None:
    x = np.random.default_rng(1).random((1, 1, 8, 8), dtype=np.float32)
    with torch.no_grad():
        ref = load(tiny_bundle).load_torch_encoder()(torch.from_numpy(x)).numpy()
    assert np.abs(OnnxEncoder(tiny_bundle / "encoder.onnx").encode(x) - ref).max() < 1e-4


def test_int8_encoder_is_used_only_when_close_enough(digits_bundle: Path) -> None:
    images = datasets.load("digits").images[:64]
    choice = choose_encoder(digits_bundle, images)
    assert choice.cosine_int8 is not None
    assert choice.variant in ("fp32", "int8")
    if choice.variant == "int8":
        assert choice.cosine_int8 >= 0.995
        assert choice.ms_per_batch["int8"] < choice.ms_per_batch["fp32"]
    # The status reports the provider onnxruntime actually uses (it falls back to CPU silently).
    assert choice.status()["provider"] == choice.encoder.session.get_providers()[0]


def test_exported_classifier_matches_torch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = SmallCNN(8, 10).eval()
    export_classifier(model, tmp_path / "m.onnx")
    x = np.random.default_rng(0).random((5, 1, 8, 8), dtype=np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    got = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
    assert np.abs(got - ref).max() < 1e-4
