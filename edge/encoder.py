"""The edge's encoder: an ONNX model run by onnxruntime, fp32 or static int8, whichever is faster here.

No torch. The choice is measured on the machine the edge runs on, because int8 kernels win on some
CPUs and lose on others, and it is reported in the edge's status.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

MIN_COSINE = 0.995


def providers(prefer_cuda: bool = True) -> list[str]:
    """CUDA first when this onnxruntime build has it, CPU always."""
    available = ort.get_available_providers()
    chosen = ["CUDAExecutionProvider"] if prefer_cuda and "CUDAExecutionProvider" in available else []
    return [*chosen, "CPUExecutionProvider"]


class OnnxEncoder:
    """Runs an encoder ONNX file: images [N, 1, S, S] in [0, 1] -> embeddings [N, D]."""

    def __init__(self, path: Path, prefer_cuda: bool = True, threads: int | None = None):
        self.path = Path(path)
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(self.path), opts, providers=providers(prefer_cuda))
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.image_size = int(inp.shape[-1])

    @property
    def provider(self) -> str:
        """The execution provider actually in use (onnxruntime falls back to CPU silently)."""
        return str(self.session.get_providers()[0])

    def encode(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Embeddings of `images`."""
        images = np.ascontiguousarray(images, dtype=np.float32)
        if images.ndim != 4 or images.shape[1:] != (1, self.image_size, self.image_size):
            raise ValueError(
                f"encoder {self.path.name} expects images [N, 1, {self.image_size}, {self.image_size}], got {images.shape}"
            )
        out = [
            self.session.run(None, {self.input_name: images[i : i + batch_size]})[0]
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
    """Pick fp32 or int8 for this machine: int8 only if faster and its embeddings keep cosine >= 0.995.

    `sample` is a batch of local images used for the comparison (64 or so is plenty).
    """
    manifest = json.loads((Path(bundle_dir) / "manifest.json").read_text())
    fp32 = OnnxEncoder(Path(bundle_dir) / "encoder.onnx", prefer_cuda, threads)
    timings = {"fp32": _time(fp32, sample)}
    int8_path = Path(bundle_dir) / "encoder.int8.onnx"
    cosine = None
    chosen, variant = fp32, "fp32"
    if int8_path.is_file() and len(sample):
        int8 = OnnxEncoder(int8_path, prefer_cuda, threads)
        a, b = fp32.encode(sample), int8.encode(sample)
        cosine = float(np.min((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))
        timings["int8"] = _time(int8, sample)
        if cosine >= MIN_COSINE and timings["int8"] < timings["fp32"]:
            chosen, variant = int8, "int8"
    return EncoderChoice(chosen, str(manifest["encoder_id"]), variant, chosen.provider, cosine, timings)
