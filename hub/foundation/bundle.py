"""A foundation model on disk: manifest, ONNX encoder (fp32 and int8), torch encoder, generator, scheduler.

Layout of a bundle directory:
    manifest.json            how it was made and how good it is
    encoder.onnx             fp32 encoder for the edges (onnxruntime)
    encoder.int8.onnx        static QDQ int8 encoder
    encoder/                 torch encoder (diffusers config + safetensors), for parity checks
    generator/               PrototypeConditionedUNet (config + safetensors)
    scheduler/               DDIM scheduler config used for sampling
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from diffusers import DDIMScheduler

from hub.export import export_onnx
from hub.foundation.encoder import ConvEncoder
from hub.foundation.generator import PrototypeConditionedUNet
from hub.foundation.manifest import EncoderBundle
from runtime.files import sha256_file


def export_encoder_onnx(encoder: ConvEncoder, path: Path) -> None:
    """The encoder for the edges: `image` in [0, 1] -> unit-norm `embedding` [N, D]."""
    export_onnx(encoder, int(encoder.config.image_size), path, "embedding")


def quantize_encoder_int8(fp32_path: Path, out_path: Path, calibration: np.ndarray) -> None:
    """Static QDQ int8 quantization calibrated on `calibration` images (dynamic is slow for convs)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"image": calibration[i : i + 64]} for i in range(0, len(calibration), 64)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    pre = out_path.with_suffix(".pre.onnx")
    quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
    quantize_static(
        str(pre), str(out_path), Reader(), quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=True,
    )  # fmt: skip
    pre.unlink()


@dataclass
class Foundation(EncoderBundle):
    """A loaded foundation model: what synthesis needs (the manifest's fields, hub/foundation/manifest.py)."""

    generator: PrototypeConditionedUNet
    scheduler: DDIMScheduler

    def load_torch_encoder(self) -> ConvEncoder:
        """The torch encoder (hub-side parity checks and evaluation)."""
        return ConvEncoder.from_pretrained(str(self.path / "encoder"), low_cpu_mem_usage=False).eval()


def load(path: str | Path, device: str = "cpu") -> Foundation:
    """Load a bundle from a local directory; never touches the network."""
    path = Path(path)
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{path} is not a foundation bundle: {manifest_path} is missing")
    manifest = json.loads(manifest_path.read_text())
    generator = (
        PrototypeConditionedUNet.from_pretrained(str(path / "generator"), low_cpu_mem_usage=False).to(device).eval()
    )
    scheduler = DDIMScheduler.from_pretrained(str(path / "scheduler"))
    return Foundation(path=path, manifest=manifest, generator=generator, scheduler=scheduler)


def encoder_id_for(onnx_path: Path, name: str) -> str:
    """Encoder id: the bundle's name and the hash of its fp32 ONNX file."""
    return f"{name}-{sha256_file(onnx_path)[:12]}"


def write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    """Write `manifest.json`, recording the sha256 of every other file in the bundle."""
    files = {
        str(p.relative_to(path)): sha256_file(p)
        for p in sorted(path.rglob("*"))
        if p.is_file() and p.name != "manifest.json"
    }
    (path / "manifest.json").write_text(json.dumps({**manifest, "files": files}, indent=2) + "\n")


def save_bundle(
    path: Path,
    name: str,
    encoder: ConvEncoder,
    generator: PrototypeConditionedUNet,
    calibration: np.ndarray,
    manifest: dict[str, Any],
) -> dict[str, Any]:
    """Write a complete bundle to `path` (created): weights, ONNX fp32 + int8, scheduler, manifest."""
    from hub.foundation.generator import training_scheduler

    path.mkdir(parents=True, exist_ok=True)
    encoder.save_pretrained(str(path / "encoder"))
    generator.save_pretrained(str(path / "generator"))
    DDIMScheduler.from_config(training_scheduler().config).save_pretrained(str(path / "scheduler"))
    export_encoder_onnx(encoder, path / "encoder.onnx")
    quantize_encoder_int8(path / "encoder.onnx", path / "encoder.int8.onnx", calibration)
    full = {
        "name": name,
        "encoder_id": encoder_id_for(path / "encoder.onnx", name),
        "embedding_dim": int(encoder.config.dim),
        "image_size": int(encoder.config.image_size),
        **manifest,
    }
    write_manifest(path, full)
    return full
