"""bench/encode: the bundled encoder on the edge path. onnxruntime vs torch eager, batch 1 and 64, fp32 and int8.

    python -m bench.encode [--dataset digits]

Writes bench/results/encode.json and encode.md. The int8 model is static QDQ (dynamic quantization of
convolutions is slow); its embeddings are compared with fp32 by cosine similarity.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

import bundled
from edge.encoder import MIN_COSINE, OnnxEncoder, choose_encoder
from hub import datasets
from hub.foundation.bundle import load as load_foundation

RESULTS = Path(__file__).resolve().parent / "results"


def time_ms(fn, x, repeats: int) -> float:
    """Median milliseconds per call after warm-up."""
    for _ in range(10):
        fn(x)
    runs = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn(x)
        runs.append((time.perf_counter() - t) * 1000)
    return statistics.median(runs)


def run(dataset: str) -> dict:
    """Measure one bundled encoder."""
    path = bundled.path(dataset)
    fm = load_foundation(path)
    data = datasets.load(dataset)
    ds = fm.manifest["dataset"]
    sp = datasets.split(len(data.labels), ds["split_seed"], ds["public_frac"], ds["test_frac"])
    images = data.images[sp.test]
    torch_enc = fm.load_torch_encoder()
    fp32, int8 = OnnxEncoder(path / "encoder.onnx"), OnnxEncoder(path / "encoder.int8.onnx")

    @torch.no_grad()
    def torch_run(x: np.ndarray) -> np.ndarray:
        return torch_enc(torch.from_numpy(x)).numpy()

    ref = torch_run(images)
    a, b = fp32.encode(images), int8.encode(images)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    rows = []
    for batch, repeats in ((1, 500), (64, 100)):
        x = np.ascontiguousarray(images[:batch])
        t_torch = time_ms(torch_run, x, repeats)
        for variant, enc in (("fp32", fp32), ("int8", int8)):
            t = time_ms(enc.encode, x, repeats)
            rows.append({
                "batch": batch, "runtime": f"onnxruntime-{variant}", "ms_per_batch": round(t, 4),
                "images_per_s": round(batch / t * 1000, 1), "speedup_vs_torch": round(t_torch / t, 2),
            })  # fmt: skip
        rows.append({"batch": batch, "runtime": "torch-eager", "ms_per_batch": round(t_torch, 4),
                     "images_per_s": round(batch / t_torch * 1000, 1), "speedup_vs_torch": 1.0})  # fmt: skip
    choice = choose_encoder(path, np.ascontiguousarray(images[:64]))
    return {
        "dataset": dataset,
        "encoder_id": fm.encoder_id,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "versions": {"onnxruntime": ort.__version__, "torch": torch.__version__},
        "provider": fp32.provider,
        "fp32_max_abs_diff_vs_torch": float(np.abs(a - ref).max()),
        "int8_cosine_vs_fp32": {"min": float(cos.min()), "mean": float(cos.mean())},
        "onnx_bytes": {
            "fp32": (path / "encoder.onnx").stat().st_size,
            "int8": (path / "encoder.int8.onnx").stat().st_size,
        },
        "rows": rows,
        "edge_choice": {k: v for k, v in choice.status().items()},
        "min_cosine": MIN_COSINE,
    }


def markdown(results: list[dict]) -> str:
    """Tables for every dataset."""
    lines = ["# bench/encode results", "", "Command: `python -m bench.encode`", ""]
    for r in results:
        lines += [
            f"## {r['dataset']} ({r['encoder_id']}), {r['machine']}, provider {r['provider']}", "",
            f"fp32 ONNX vs torch max |diff|: {r['fp32_max_abs_diff_vs_torch']:.2e}; int8 cosine to fp32: min {r['int8_cosine_vs_fp32']['min']:.4f}, "
            f"mean {r['int8_cosine_vs_fp32']['mean']:.4f}; sizes fp32 {r['onnx_bytes']['fp32']} B, int8 {r['onnx_bytes']['int8']} B.", "",
            "| batch | runtime | ms/batch | images/s | speed-up vs torch eager |", "|---|---|---|---|---|",
        ]  # fmt: skip
        lines += [
            f"| {x['batch']} | {x['runtime']} | {x['ms_per_batch']:.3f} | {x['images_per_s']:.0f} | {x['speedup_vs_torch']:.2f}x |"
            for x in r["rows"]
        ]
        c = r["edge_choice"]
        lines += [
            "",
            f"Edge choice on this machine: **{c['variant']}** (int8 used only if faster and cosine >= {r['min_cosine']}; measured ms/batch of 64: {c['ms_per_batch']}).",
            "",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run and write results."""
    ap = argparse.ArgumentParser(prog="python -m bench.encode", description=__doc__)
    ap.add_argument("--datasets", nargs="+", default=["digits", "mnist"])
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    results = [run(d) for d in args.datasets]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "encode.json").write_text(json.dumps(results, indent=1) + "\n")
    md = markdown(results)
    (args.out / "encode.md").write_text(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
