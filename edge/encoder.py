"""The edge's encoder: an ONNX model run by onnxruntime, fp32 or static int8, whichever is faster here.

No torch. The choice is measured on the machine the edge runs on, because int8 kernels win on some
CPUs and lose on others, and it is reported in the edge's status.

A site's images arrive as [N, 1, S, S] in [0, 1] (contract/layout: luminance, resized by fit_image).
The bundled encoders take exactly that. An encoder whose bundle manifest has an `input` section
with 3 channels and a mean/std (the general ImageNet encoder, hub/foundation/general.py) gets the
grayscale replicated to RGB and normalised per channel here, so the rest of the edge is unchanged.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

MIN_COSINE = 0.995


def providers(prefer_cuda: bool = True) -> list[str]:
    """CUDA first when this onnxruntime build has it, CPU always."""
    available = ort.get_available_providers()
    chosen = ["CUDAExecutionProvider"] if prefer_cuda and "CUDAExecutionProvider" in available else []
    return [*chosen, "CPUExecutionProvider"]


@dataclass(frozen=True)
class InputSpec:
    """What an encoder takes: how many channels, and the per-channel (x - mean) / std on x in [0, 1], if any."""

    channels: int = 1
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise ValueError(f"an encoder input has 1 or 3 channels, not {self.channels}")
        if (self.mean is None) != (self.std is None):
            raise ValueError("an encoder input normalisation needs both mean and std")
        if self.mean is not None and self.std is not None:
            if len(self.mean) != self.channels or len(self.std) != self.channels:
                raise ValueError(f"mean and std need one value per channel ({self.channels})")
            if min(self.std) <= 0:
                raise ValueError("std must be positive")

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any]) -> InputSpec:
        """The manifest's `input` section; a manifest without one (digits, mnist) means 1 channel, as is."""
        spec = manifest.get("input")
        if not isinstance(spec, dict) or "channels" not in spec:
            return cls()
        mean, std = spec.get("mean"), spec.get("std")
        return cls(
            int(spec["channels"]),
            tuple(float(v) for v in mean) if mean is not None else None,
            tuple(float(v) for v in std) if std is not None else None,
        )

    @classmethod
    def for_bundle(cls, bundle_dir: Path) -> InputSpec:
        """The spec in `bundle_dir/manifest.json`, or the plain one when there is no manifest."""
        path = Path(bundle_dir) / "manifest.json"
        return cls.from_manifest(json.loads(path.read_text())) if path.is_file() else cls()

    @property
    def identity(self) -> bool:
        """True when images go to the encoder as they are (the bundled 1-channel encoders)."""
        return self.channels == 1 and self.mean is None

    def prepare(self, images: np.ndarray) -> np.ndarray:
        """Site images [N, 1 or C, S, S] in [0, 1] -> the encoder's input: grayscale replicated, normalised."""
        if self.identity:
            return images
        x = np.repeat(images, self.channels, axis=1) if images.shape[1] == 1 and self.channels > 1 else images
        if self.mean is not None and self.std is not None:
            mean = np.asarray(self.mean, np.float32)[None, :, None, None]
            std = np.asarray(self.std, np.float32)[None, :, None, None]
            x = (x - mean) / std
        return np.ascontiguousarray(x, dtype=np.float32)


class OnnxEncoder:
    """Runs an encoder ONNX file: images [N, 1, S, S] in [0, 1] -> embeddings [N, D].

    `input_spec` defaults to the `input` section of the manifest.json beside the file (InputSpec).
    """

    def __init__(
        self, path: Path, prefer_cuda: bool = True, threads: int | None = None, input_spec: InputSpec | None = None
    ):
        self.path = Path(path)
        self.input_spec = input_spec if input_spec is not None else InputSpec.for_bundle(self.path.parent)
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(self.path), opts, providers=providers(prefer_cuda))
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.image_size = int(inp.shape[-1])
        if isinstance(inp.shape[1], int) and inp.shape[1] != self.input_spec.channels:
            raise ValueError(
                f"encoder {self.path.name} takes {inp.shape[1]} channels but its manifest says "
                f"{self.input_spec.channels}"
            )

    @property
    def provider(self) -> str:
        """The execution provider actually in use (onnxruntime falls back to CPU silently)."""
        return str(self.session.get_providers()[0])

    def encode(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Embeddings of `images`."""
        images = np.ascontiguousarray(images, dtype=np.float32)
        s, c = self.image_size, self.input_spec.channels
        if images.ndim != 4 or images.shape[1] not in {1, c} or images.shape[2:] != (s, s):
            expected = "1" if c == 1 else f"1 or {c}"
            raise ValueError(f"encoder {self.path.name} expects images [N, {expected}, {s}, {s}], got {images.shape}")
        out = [
            self.session.run(None, {self.input_name: self.input_spec.prepare(images[i : i + batch_size])})[0]
            for i in range(0, len(images), batch_size)
        ]
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


@dataclass(frozen=True)
class EncoderChoice:
    """Which encoder variant the edge uses and why."""

    encoder: OnnxEncoder
    encoder_id: str
    variant: str  # "fp32" or "int8"
    provider: str
    cosine_int8: float | None
    ms_per_batch: dict[str, float]

    def status(self) -> dict[str, object]:
        """What the edge reports about its encoder."""
        return {
            "encoder_id": self.encoder_id,
            "variant": self.variant,
            "provider": self.provider,
            "cosine_int8_vs_fp32": self.cosine_int8,
            "ms_per_batch": self.ms_per_batch,
        }


def _time(enc: OnnxEncoder, x: np.ndarray, repeats: int = 5) -> float:
    enc.encode(x)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        enc.encode(x)
        best = min(best, time.perf_counter() - t)
    return best * 1000


def choose_encoder(
    bundle_dir: Path, sample: np.ndarray, prefer_cuda: bool = True, threads: int | None = None
) -> EncoderChoice:
    """Pick fp32 or int8 for this machine: int8 only if faster and its embeddings keep cosine >= 0.995,
    and only if the manifest's `edge_variants` (default both) offers it.

    `sample` is a batch of local images used for the comparison (64 or so is plenty).
    """
    manifest = json.loads((Path(bundle_dir) / "manifest.json").read_text())
    fp32 = OnnxEncoder(Path(bundle_dir) / "encoder.onnx", prefer_cuda, threads)
    timings = {"fp32": _time(fp32, sample)}
    int8_path = Path(bundle_dir) / "encoder.int8.onnx"
    cosine = None
    chosen, variant = fp32, "fp32"
    # A bundle may restrict its variants (the general encoder: int8 costs too much accuracy downstream).
    offered = manifest.get("edge_variants", ["fp32", "int8"])
    if "int8" in offered and int8_path.is_file() and len(sample):
        int8 = OnnxEncoder(int8_path, prefer_cuda, threads)
        a, b = fp32.encode(sample), int8.encode(sample)
        cosine = float(np.min((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))
        timings["int8"] = _time(int8, sample)
        if cosine >= MIN_COSINE and timings["int8"] < timings["fp32"]:
            chosen, variant = int8, "int8"
    return EncoderChoice(chosen, str(manifest["encoder_id"]), variant, chosen.provider, cosine, timings)
